"""Make the owner's signing key pair: ``python launch/keygen.py DIR`` writes ``DIR/amint_signing_key.pem``
(private, mode 0600: keep it; train with ``AMINT_SIGNING_KEY=DIR/amint_signing_key.pem``) and
``DIR/amint_signing_key.pub.pem`` (public: give it to auditors, ``audit.public_key=...``)."""

import argparse
import sys

from amint_dist.records.signing import fingerprint, generate_keypair, load_public_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the key pair (never overwrites a key file)")
    args = parser.parse_args(argv)
    try:
        private, public = generate_keypair(args.directory)
    except (FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"private key: {private} (keep it secret; AMINT_SIGNING_KEY={private})\n"
          f"public key:  {public} (fingerprint {fingerprint(load_public_key(public))})")


if __name__ == "__main__":
    main()
