"""The data: loaders for user data, the leave-one-out protocol, the canonical dataset and the data stage."""
