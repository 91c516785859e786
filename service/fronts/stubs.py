"""gRPC messages and service stubs, compiled from service/fronts/protos/flux/v1/flux.proto by grpcio-tools at import."""

import sys
from pathlib import Path

import grpc

PROTO_ROOT = Path(__file__).resolve().parent / "protos"
PROTO_FILE = "flux/v1/flux.proto"
if str(PROTO_ROOT) not in sys.path:
    sys.path.append(str(PROTO_ROOT))  # grpc.protos_and_services resolves .proto files on sys.path

messages, services = grpc.protos_and_services(PROTO_FILE)
SERVICE_NAME = messages.DESCRIPTOR.services_by_name["TextToImage"].full_name  # "flux.v1.TextToImage"
JOBS_SERVICE_NAME = messages.DESCRIPTOR.services_by_name["Jobs"].full_name
