"""Without calvin_env, sim_eval.world.calvin_bridge still imports, and building an env says how to install calvin_env.
Runs everywhere: calvin_env is hidden from the import system even where it is installed."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def no_calvin_env(monkeypatch):
    # A None entry in sys.modules makes `import calvin_env` raise ImportError, installed or not.
    for name in [m for m in sys.modules if m == "calvin_env" or m.startswith("calvin_env.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "calvin_env", None)


def test_module_imports_without_calvin_env(no_calvin_env):
    import importlib

    import sim_eval.world.calvin_bridge as bridge

    importlib.reload(bridge)  # module level must not touch calvin_env
    assert bridge.CalvinEnv.__doc__


def test_missing_calvin_env_gives_install_instructions(no_calvin_env):
    from sim_eval.world.calvin_bridge import CalvinEnv, CalvinEnvNotInstalled

    with pytest.raises(CalvinEnvNotInstalled) as err:
        CalvinEnv()
    message = str(err.value)
    for fragment in ("797142c", "git work tree", "gym==0.26.2", "--no-deps -e", "dataset is not needed"):
        assert fragment in message, fragment
    assert isinstance(err.value, ImportError)
