"""Who may call Kaizen: API keys, roles and rate limits (:mod:`.keys`)."""
