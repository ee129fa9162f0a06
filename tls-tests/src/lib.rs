//! Nothing here: the TLS integration tests of locked-cache live in `tests/`,
//! in a crate of their own so that the main crate's dev-dependencies (which
//! every example compiles) do not include the certificate generator.
