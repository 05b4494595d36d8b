"""Backend health checks and the cluster's single backend view.

Modules, one job each:

- ``base``       CheckResult(up, reason, latency) and the Checker protocol.
- ``tcp``, ``http`` (HTTP and HTTPS), ``udp``, ``exec``: one checker each; they only
  report up/down with a reason.
- ``factory``    config -> CheckTarget per backend (checker, interval, timeout,
  rise/fall).
- ``state``      pure: rise/fall counting, flap damping, BackendHealth.
- ``scheduler``  asyncio: every check concurrently, isolated from crashes.
- ``view``       pure: states + drains -> HealthView (deterministic JSON, revision);
  HealthView + config -> the services the dataplane must hold.
- ``publish``    etcd: publish/watch the view, operator drains.

How the agent wires it::

    from halb.checks.factory import targets_from_config
    from halb.checks.scheduler import CheckScheduler
    from halb.checks.publish import HealthKeys, HealthPublisher, LeaderGuard
    from halb.checks.publish import run_publisher, watch_views
    from halb.checks.view import effective_services, states_from_view

    keys = HealthKeys.from_config(cfg)
    # Every node runs the checks (long-lived, whatever its role), so a promoted standby
    # has warm states. A freshly started agent may seed them from the published view:
    # CheckScheduler(targets, initial_states=states_from_view(view)).
    sched = CheckScheduler(targets_from_config(cfg))
    tg.create_task(sched.run())

    # Every node applies the published view (the active one too, through the same
    # watch), so all nodes build identical rings from identical inputs.
    async for view in watch_views(client, keys):
        dataplane.apply(effective_services(cfg.services(), view))

    # The active node, in its term's task group (returns if the term is lost):
    pub = HealthPublisher(client, keys, node=me, term=str(term),
                          guard=LeaderGuard(leader_key, term.revision))
    term_tg.create_task(run_publisher(pub, cfg.services, sched))

On a config reload, build a new scheduler with ``initial_states=old.states()``.
"""
