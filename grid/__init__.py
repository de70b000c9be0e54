"""bdgrid's grid layer: spec -> validated plan -> Ray DAG; artifact store; resume; tuning; CLI."""
