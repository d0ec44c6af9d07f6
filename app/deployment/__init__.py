"""Deployment: validation verdicts, the deployer's state machine, the canary's live comparison."""
