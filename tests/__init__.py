import pytest

# The shared helpers hold assertions: let pytest explain their failures too.
pytest.register_assert_rewrite("tests.helpers")
