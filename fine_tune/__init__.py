"""Fine-tuning: map-caption pairs from the catalogue, training, evaluation, registration."""
