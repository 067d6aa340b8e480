"""Model implementations behind one contract; importing this package imports no ML framework."""
