# tern-proxy, the sidecar: the release binary and the glibc it links, nothing else.
# Built by docker/build-images.sh (the context is the staged root filesystem).
FROM scratch
COPY rootfs/ /
# tern-init leaves traffic from this UID alone, so the proxy's own connections
# are never redirected back to itself.
USER 2102:2102
EXPOSE 4143 4140 4191
ENTRYPOINT ["/usr/local/bin/tern-proxy"]
