# The demo apps (pay, order, loadgen): release binaries and the glibc they link.
# Built by docker/build-images.sh (the context is the staged root filesystem).
FROM scratch
COPY rootfs/ /
USER 65534:65534
ENTRYPOINT []
CMD ["/usr/local/bin/pay", "--listen", "0.0.0.0:50051"]
