"""Learning algorithms: dataset selection, SSR rehearsal selection, gradient masking."""
