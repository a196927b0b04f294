//! Keystone Fernet token validation and minting, compatible with Keystone 30.0.0
//! for every payload version (0 to 10).
