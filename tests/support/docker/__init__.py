"""Helpers of the Docker plugin tests: the plugin served in a child
process and a client of its protocol (:mod:`.plugin_util`), and Docker's
graphtest built from Debian's docker.io source (:mod:`.build_graphtest`)."""
