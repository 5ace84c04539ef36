"""Environment defaults: applied before torch/TensorFlow, never over the user's values."""

import json
import subprocess
import sys

from mirwatch import envdefaults


def test_defaults_fill_gaps_and_never_override():
    env = {"OMP_NUM_THREADS": "3"}
    applied = envdefaults.apply({"OMP_NUM_THREADS": "8", "MY_VAR": "x"}, env)
    assert env["OMP_NUM_THREADS"] == "3" and "OMP_NUM_THREADS" not in applied
    assert env["MY_VAR"] == "x" and env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_cli_applies_them_before_torch_is_imported(tmp_path):
    (tmp_path / "lib").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[library]\nroots = ["{tmp_path / "lib"}"]\n[env]\nMIRWATCH_PROBE = "from-config"\n')
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        "import mirwatch.cli as cli\n"
        "seen = {}\n"
        "real_apply = cli.envdefaults.apply\n"
        "def spy(configured, environ=None):\n"
        "    seen['torch_loaded'] = 'torch' in sys.modules\n"
        "    return real_apply(configured, environ)\n"
        "cli.envdefaults.apply = spy\n"
        "cli.main(['analyze', '--config', sys.argv[1], '/nonexistent/full_mix.flac'])\n"
        "print(json.dumps({'seen': seen, 'probe': os.environ.get('MIRWATCH_PROBE'),"
        " 'omp': os.environ.get('OMP_NUM_THREADS')}))\n"
    )
    out = subprocess.run([sys.executable, str(script), str(cfg)], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "5", "MIRWATCH_NO_JOURNAL": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"seen": {"torch_loaded": False}, "probe": "from-config", "omp": "5"}
