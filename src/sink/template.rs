//! Name templates (file names, remote paths, MQTT topics): `{placeholder}` over event fields and
//! output fields.
//!
//! PLACEHOLDER: the interface below is fixed; the implementation is being written.
