"""The fleet coordinator: moves power between the hosts of one group under the group budget."""
