"""Sub-commands of the ``muonkit`` command line."""
