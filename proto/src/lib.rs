//! Generated gRPC types and stubs for Tern's protocols: the order→pay demo
//! services, the `Echo` service the end-to-end tests drive through the proxy,
//! the control-plane push API and certificate issuance; plus gRPC status
//! code names.

pub mod grpc_code;

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
