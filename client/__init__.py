"""fedrec's Flower ClientApp (thin adapter over ``fedrec.federated``)."""
