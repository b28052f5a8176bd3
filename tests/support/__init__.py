"""The tests' helpers, imported as ``support.<module>`` (pytest puts the
tests directory on ``sys.path``; the repository root need not be):

- :mod:`support.witness`: independent witnesses of kernel state (dmsetup, sysfs).
- :mod:`support.blockio`: loop devices by losetup, reads and writes at offsets.
- :mod:`support.children`: a fresh Python provisioning a pool, maybe armed to
  crash; a plugin's ``serve`` started and stopped.
- :mod:`support.poll`: the one polling loop (``until``, ``wait_for``).
- :mod:`support.cli`: the ``libdm`` command and the monitor service as run
  by the tests, and the checks of their exit status and errors.
- :mod:`support.store`: a state store with no kernel.
- :mod:`support.tarball`: layer tars written in memory.
- :mod:`support.pool_model`, :mod:`support.pool_machine`: the model and
  state machines of test_stateful.py.
- :mod:`support.modgraph`: libdm's import graph, read with ``ast``.
- :mod:`support.reliability`: figures for the reliability report.
- :mod:`support.containerd`: the snapshotter plugin in a child process, and
  containerd's conformance suite.
"""
