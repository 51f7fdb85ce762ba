//! Generated gRPC types and stubs for Tern's protocols: the order→pay demo
//! services, the `Echo` service the end-to-end tests drive through the proxy,
//! the control-plane push API and certificate issuance; plus gRPC status
//! code names.

pub mod grpc_code;

/// The largest retry-budget floor (retries per second always allowed) a
/// route may carry: tern-control refuses more in config, and a sidecar
/// refuses a snapshot or bootstrap file with more (tower's budget panics at
/// `i32::MAX` and up).
pub const MAX_BUDGET_MIN_PER_SECOND: u32 = 1_000_000;

pub mod demo {
    pub mod v1 {
        tonic::include_proto!("tern.demo.v1");
    }
}

pub mod test {
    pub mod v1 {
        tonic::include_proto!("tern.test.v1");
    }
}

pub mod control {
    pub mod v1 {
        tonic::include_proto!("tern.control.v1");
    }
}

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("tern.identity.v1");
    }
}
