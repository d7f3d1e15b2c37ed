"""What people see: the HTML report from the record, the live dashboard's scalars, the console view of a run."""
