//! Generated gRPC types and stubs for Tern's protocols: the order→pay demo
//! services and the `Echo` service the end-to-end tests drive through the proxy.

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
