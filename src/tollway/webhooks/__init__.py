"""Inbound webhooks: each one verified with its sender's official library before it may act.

Modules:
  stripe.py          Stripe top-ups: Checkout sessions and the signature-verified webhook
  stripe_refunds.py  refunds and disputes: how they find their top-up and what they debit
  clerk.py           POST /webhooks/clerk: Svix-verified Clerk events that evict keys or
                     delete a deleted user's or organisation's tenant
"""
