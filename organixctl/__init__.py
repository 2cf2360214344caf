"""organixctl: the admin's command-line client and the operator's local tools.

Commands that talk to the daemon import only the standard library so that they
start fast; local commands (keygen, publish, verify, provision) import the heavy
libraries inside the command that needs them.
"""
