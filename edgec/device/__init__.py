"""On-device validation: verification bundles, verification over ssh, bundled checks for phones, and diagnosis."""
