"""Flotilla's gRPC API: `flotilla.proto` and the stubs generated from it (`make proto`)."""
