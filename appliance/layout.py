"""Where an appliance lives on the device: one file (data/layout.json) that this module, the CLI
defaults, the settings and the Ansible roles all read, so a path is written once."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

_LAYOUT = json.loads((resources.files("appliance") / "data/layout.json").read_text())

SERVICE_USER: str = _LAYOUT["user"]
VENV = Path(_LAYOUT["venv"])
CONFIG_FILE = Path(_LAYOUT["config_file"])
API_KEY_FILE = Path(_LAYOUT["api_key_file"])
STATE_DIR = Path(_LAYOUT["state_dir"])
MODELS_DIR = Path(_LAYOUT["models_dir"])
UNITS: tuple[str, ...] = tuple(_LAYOUT["units"])
