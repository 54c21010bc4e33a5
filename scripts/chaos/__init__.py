"""The fault-injection suite: real workers, a real cluster, real faults.

A dev tool run from a checkout (``python scripts/chaos.py``, or ``python -m
chaos`` from ``scripts/``); it needs the dev dependencies (taskiq-redis, for
the comparison broker) and is not part of the installed package.

* :mod:`.config`: brokers, bounds and knobs of a run (``ChaosConfig``);
* :mod:`.worker`: the broker factory ``taskiq worker`` imports, the ledger task;
* :mod:`.ledger`: the execution ledger and worker events (files, not Redis);
* :mod:`.processes`: worker process groups and one-shot commands;
* :mod:`.producer`: kicks at a fixed rate with the outcome of each (for the
  stream broker a mix of plain, prioritised and delayed kicks);
* :mod:`.probes`: what the queue holds in Redis (backlog, pending, dead letters);
* :mod:`.faults`: what each scenario does to workers, nodes, slots, the rebalancer;
* :mod:`.scenarios`: each fault with its acceptance rules and defaults;
* :mod:`.harness`: the controller that runs scenarios;
* :mod:`.report`: kicks against executions, the table and the JSON report;
* :mod:`.cli`: ``scripts/chaos.py``'s arguments and output.

docs/guarantees.md says what each scenario measured.
"""
