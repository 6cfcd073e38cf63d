"""Hosts reached over SSH (a destination host for cross-host migration), and the network
namespaces with their own sshd that stand in for two hosts in tests."""
