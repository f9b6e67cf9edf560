"""The outbound relay: the durable queue's worker and delivery status notifications."""
