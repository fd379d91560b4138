"""Export: checkpoint -> bundle; bundle loading and verification; the parity checker."""
