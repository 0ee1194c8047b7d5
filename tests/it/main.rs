//! The integration tests: each starts the real `ess-agent` binary.

mod support;

mod adapter_authoring;
mod adapter_fixtures;
mod apply;
mod connections;
mod console;
mod console_api;
mod crashloop;
mod docs;
mod ha;
mod hostile;
mod jsonata_conformance;
mod layering;
mod operations;
mod packaging;
mod per_event;
mod receive;
mod reload;
mod sink_amqp;
mod sink_exec;
mod sink_file;
mod sink_mqtt;
mod sink_nats;
mod sink_redis;
mod sink_sftp;
mod sink_sql;
