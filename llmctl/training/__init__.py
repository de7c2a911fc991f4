"""The one training loop of every command that trains: typed configs, batches, the loop and its contracts."""
