"""A package only so that its conftest.py is imported as ``natlab.conftest``.

Without it, pytest imports this directory's conftest.py under the bare name
``conftest`` too, replacing tests/conftest.py in ``sys.modules``: every test
module collected after this directory would then fail ``from conftest import
wait_until``.
"""
