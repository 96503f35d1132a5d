"""SVB/BBN model zoo: importing this package registers the models with timm."""
