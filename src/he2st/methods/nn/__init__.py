"""Parts shared by the neural methods: training loop, count likelihoods, heads,
contrastive losses, graph builders. Each part lives here once and is reused."""
