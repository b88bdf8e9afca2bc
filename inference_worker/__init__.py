"""Consumes chat jobs from RabbitMQ and streams the answers back."""
