// A grpc-go server for the tern.test.v1.Echo service, so the tests meet grpc-go's own HTTP/2
// and gRPC handling (its grpc-timeout parsing, its GOAWAYs, its limits) behind the sidecars.
//
// Built offline from Debian's golang-google-grpc-dev and golang-google-protobuf-dev in GOPATH
// mode. Messages travel as raw bytes through a codec registered under the name "proto" and are
// read and written field by field with protowire, so no generated code is needed.
//
// Usage: echo-server-go -listen 127.0.0.1:0 -name echo-go
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("raw codec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("raw codec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// echoRequest holds the fields of tern.test.v1.EchoRequest.
type echoRequest struct {
	message   string
	payload   []byte
	replySize uint64
	count     uint64
	delayMs   uint64
	failCode  int32
}

func parseRequest(b []byte) (echoRequest, error) {
	var r echoRequest
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return r, protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return r, protowire.ParseError(m)
			}
			r.message, n = string(v), m
		case num == 2 && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return r, protowire.ParseError(m)
			}
			r.payload, n = append([]byte(nil), v...), m
		case typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return r, protowire.ParseError(m)
			}
			n = m
			switch num {
			case 3:
				r.replySize = v
			case 4:
				r.count = v
			case 5:
				r.delayMs = v
			case 6:
				r.failCode = int32(v)
			}
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return r, protowire.ParseError(n)
			}
		}
		b = b[n:]
	}
	return r, nil
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendVarint(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

type server struct {
	name      string
	calls     uint64
	cancelled uint64
}

// reply encodes a tern.test.v1.EchoReply.
func (s *server) reply(r echoRequest, seq uint64) *[]byte {
	var b []byte
	b = appendString(b, 1, r.message)
	payload := r.payload
	if r.replySize > 0 {
		payload = make([]byte, r.replySize)
	}
	if len(payload) > 0 {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, payload)
	}
	b = appendString(b, 3, s.name)
	b = appendVarint(b, 5, seq)
	return &b
}

// wait sleeps for the request's delay, or until the call is cancelled.
func (s *server) wait(ctx context.Context, r echoRequest) error {
	if r.delayMs == 0 {
		return nil
	}
	select {
	case <-time.After(time.Duration(r.delayMs) * time.Millisecond):
		return nil
	case <-ctx.Done():
		atomic.AddUint64(&s.cancelled, 1)
		return ctx.Err()
	}
}

func (s *server) unary(ctx context.Context, in []byte) (*[]byte, error) {
	atomic.AddUint64(&s.calls, 1)
	r, err := parseRequest(in)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "bad EchoRequest: %v", err)
	}
	if err := s.wait(ctx, r); err != nil {
		return nil, err
	}
	if r.failCode != 0 {
		return nil, status.Error(codes.Code(r.failCode), r.message)
	}
	return s.reply(r, 0), nil
}

func (s *server) stats() *[]byte {
	var b []byte
	b = appendString(b, 1, s.name)
	b = appendVarint(b, 2, atomic.LoadUint64(&s.calls))
	b = appendVarint(b, 3, atomic.LoadUint64(&s.cancelled))
	return &b
}

func unaryHandler(srv interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	return srv.(*server).unary(ctx, in)
}

func statsHandler(srv interface{}, _ context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	return srv.(*server).stats(), nil
}

// bidiHandler answers each message as it comes, numbering the replies from 1.
func bidiHandler(srv interface{}, stream grpc.ServerStream) error {
	s := srv.(*server)
	atomic.AddUint64(&s.calls, 1)
	for seq := uint64(1); ; seq++ {
		var in []byte
		if err := stream.RecvMsg(&in); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		r, err := parseRequest(in)
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "bad EchoRequest: %v", err)
		}
		if err := s.wait(stream.Context(), r); err != nil {
			return err
		}
		if err := stream.SendMsg(s.reply(r, seq)); err != nil {
			return err
		}
	}
}

// serverStreamHandler sends `count` replies.
func serverStreamHandler(srv interface{}, stream grpc.ServerStream) error {
	s := srv.(*server)
	atomic.AddUint64(&s.calls, 1)
	var in []byte
	if err := stream.RecvMsg(&in); err != nil {
		return err
	}
	r, err := parseRequest(in)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "bad EchoRequest: %v", err)
	}
	for seq := uint64(1); seq <= r.count; seq++ {
		if err := s.wait(stream.Context(), r); err != nil {
			return err
		}
		if err := stream.SendMsg(s.reply(r, seq)); err != nil {
			return err
		}
	}
	return nil
}

var echoService = grpc.ServiceDesc{
	ServiceName: "tern.test.v1.Echo",
	HandlerType: (*interface{})(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Unary", Handler: unaryHandler},
		{MethodName: "Stats", Handler: statsHandler},
	},
	Streams: []grpc.StreamDesc{
		{StreamName: "BidiStream", Handler: bidiHandler, ServerStreams: true, ClientStreams: true},
		{StreamName: "ServerStream", Handler: serverStreamHandler, ServerStreams: true},
	},
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	name := flag.String("name", "echo-go", "server name in replies")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	g := grpc.NewServer()
	g.RegisterService(&echoService, &server{name: *name})
	fmt.Printf("echo-server listening on %s\n", l.Addr())
	if err := g.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
