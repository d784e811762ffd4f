//! Conversion between JSON values and Avro values, guided by the schema (ingest and decode).
