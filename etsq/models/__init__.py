"""Policy and process-reward models behind one interface, whatever serves them."""
