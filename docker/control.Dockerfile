# tern-control: the release binary and the glibc it links.
# Built by docker/build-images.sh (the context is the staged root filesystem).
FROM scratch
COPY rootfs/ /
# An empty directory owned by tern-control's user: a volume mounted here starts
# with that ownership, so the CA can be generated on first start.
COPY --chown=2103:2103 state/ /var/lib/tern/
USER 2103:2103
EXPOSE 8090 9990 8443
ENTRYPOINT ["/usr/local/bin/tern-control"]
CMD ["--config-dir", "/etc/tern/mesh", "--state-dir", "/var/lib/tern", "--grpc-listen", "0.0.0.0:8090", "--admin-listen", "0.0.0.0:9990"]
