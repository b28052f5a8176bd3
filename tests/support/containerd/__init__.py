"""Helpers of the snapshotter tests: the plugin served in a child process
(:mod:`.snapshotter_util`) and containerd's conformance suite and probe
program (:mod:`.build_conformance`, built from the Go sources here)."""
