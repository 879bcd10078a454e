"""Flask blueprints: thin routes over the serving, hub and registry logic."""
