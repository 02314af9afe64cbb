"""The control machine's view of a fleet: the Ansible inventory's appliances, and the monitoring
that plugs them into Prometheus. Device code never imports this package."""
