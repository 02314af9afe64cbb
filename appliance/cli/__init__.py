"""`pi-appliance`: the appliance's one command. Each verb lives in the module named after its job
(service, hardware, bench, plan, model); the options they share are in `options`."""

from appliance.cli.main import main

__all__ = ["main"]
