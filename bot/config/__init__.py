"""What the policy is configured with: the charity's settings, the deployment."""
