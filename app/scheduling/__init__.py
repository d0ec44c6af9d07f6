"""Scheduling of learning cycles (the training decision engine): triggers measured from the store
(:mod:`~app.scheduling.triggers`), what a cycle needs against what the Ray cluster has free and the
off-peak window (:mod:`~app.scheduling.resources`), the cycles and decisions kept in the store
(:mod:`~app.scheduling.state`), how a cycle is launched and read back
(:mod:`~app.scheduling.launcher`), and the :class:`~app.scheduling.scheduler.Scheduler` that ties
them together (run by ``actors/scheduler.py``)."""
