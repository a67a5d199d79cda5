"""DHT layer: signed, expiring, sub-keyed records and providers over the node."""
