"""The tests' helpers, imported as ``support.<module>`` (pytest puts the
tests directory on ``sys.path``; the repository root need not be):

- :mod:`support.witness`: independent witnesses of kernel state (dmsetup, sysfs).
- :mod:`support.blockio`: loop devices by losetup, reads and writes at offsets.
- :mod:`support.children`: a fresh Python provisioning a pool, maybe armed to crash.
- :mod:`support.reliability`: figures for the reliability report.
- :mod:`support.containerd`: the snapshotter plugin in a child process, and
  containerd's conformance suite.
"""
