"""Test and bench infrastructure, like numpy.testing: tiny datasets and params (tiny.py) and real servers on
127.0.0.1 (hosts.py: an OpenSSH sshd and a TorchServe serving host) for tests/ and bench/. No stage, command,
runtime or shared module imports it (tests/test_architecture.py checks); the pipeline never runs it."""
