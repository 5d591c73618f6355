"""Real federations: a server and clients as separate programs over gRPC with mutual TLS.

certs.py           the federation's CA and the server's and clients' certificates (`splitlora certs`)
stream.py          packets as bounded chunks on a gRPC stream, and back
grpc_transport.py  the server's and a client's Transport over one bidirectional stream per client
data.py            what each party reads: a client its own file, the server no training data
membership.py      which clients are still in the run (drop-outs, min_clients)
settings.py        the `federation` config section's checks; what a federation can run
server.py          `splitlora server`
client.py          `splitlora client`
"""
